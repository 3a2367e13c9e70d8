#!/usr/bin/env bash
# Kaldi-style option parsing, sourced by recipes after their defaults:
#
#   stage=0; nj=4
#   . utils/parse_options.sh
#
# Every variable defined before sourcing becomes a flag: `--stage 3`,
# `--nj=8`; a dash in the flag name maps to an underscore (`--stop-stage`).
# `--config FILE` sources FILE first. Unknown flags are an error, so a typo
# never silently runs with a default. Positional arguments are left in "$@".

__usage() {
  echo "${help_message:-Usage: $0 [--option value] ...}" >&2
}

while [ $# -gt 0 ]; do
  case "$1" in
    --help|-h)
      __usage; exit 0 ;;
    --config)
      [ -f "${2:-}" ] || { echo "$0: config file '${2:-}' not found" >&2; exit 1; }
      . "$2"; shift 2; continue ;;
    --*=*)
      __name=$(echo "${1%%=*}" | sed 's/^--//; s/-/_/g'); __value="${1#*=}"; shift ;;
    --*)
      __name=$(echo "$1" | sed 's/^--//; s/-/_/g')
      [ $# -ge 2 ] || { echo "$0: option '$1' needs a value" >&2; exit 1; }
      __value="$2"; shift 2 ;;
    *)
      break ;;
  esac
  if ! declare -p "$__name" >/dev/null 2>&1; then
    echo "$0: unknown option --${__name}" >&2; __usage; exit 1
  fi
  # Booleans stay booleans: a flag declared true/false only takes true/false.
  __old="${!__name}"
  if { [ "$__old" = true ] || [ "$__old" = false ]; } && \
     [ "$__value" != true ] && [ "$__value" != false ]; then
    echo "$0: option --${__name} takes true or false, got '$__value'" >&2; exit 1
  fi
  printf -v "$__name" '%s' "$__value"
  unset __name __value __old
done
true
