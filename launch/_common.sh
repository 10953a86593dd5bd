#!/usr/bin/env bash
# Helpers shared by the launch scripts (sourced, not run): error exit, --dry-run printing.
# The sourcing script sets SCRIPT_NAME.

die() {
  echo "${SCRIPT_NAME}: error: $*" >&2
  echo "Run 'launch/${SCRIPT_NAME} -h' for usage." >&2
  exit 2
}

DRY_RUN=0
# Single-quotes a word only when the shell needs it, so dry-run lines stay readable and can
# be pasted back into a shell as they are.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
run() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    local sep=""
    for word in "$@"; do
      printf '%s' "${sep}"
      quote "${word}"
      sep=" "
    done
    printf '\n'
  else
    "$@"
  fi
}

need_value() {
  [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "option $1 needs a value"
}
