# Runs EXE with one bad option (OPTION VALUE) and checks what a user sees: exit status 2 and the line
# "error: OPTION: expected EXPECTED, got 'VALUE'".
execute_process(COMMAND "${EXE}" no_export no_image out.ply "${OPTION}" "${VALUE}"
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
set(line "error: ${OPTION}: expected ${EXPECTED}, got '${VALUE}'")
string(FIND "${err}" "${line}" at)
if(NOT rc EQUAL 2 OR at EQUAL -1)
  message(FATAL_ERROR "expected exit status 2 and \"${line}\", got status ${rc} and:\n${err}${out}")
endif()
