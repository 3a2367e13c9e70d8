#!/usr/bin/env bash
# Prints the path of a working python interpreter of version $1 (e.g. 3.9):
# python$1 on PATH if it runs, else the newest pyenv install of that version.
set -eu
v=$1
if command -v "python$v" >/dev/null 2>&1 && "python$v" -c pass >/dev/null 2>&1; then
  command -v "python$v"; exit 0
fi
root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
for p in $(ls -d "$root"/versions/"$v".* 2>/dev/null | sort -V -r); do
  if [ -x "$p/bin/python$v" ]; then echo "$p/bin/python$v"; exit 0; fi
done
echo "python$v not found (neither on PATH nor under $root/versions)" >&2
exit 1
