#!/bin/sh
# Make the manual pages usbipy(8) and usbipyd(8) from the same argparse parsers
# as --help (argparse-manpage, installed by setup.sh), into DIR (default: where
# man looks: /usr/local/share/man/man8 as root, else .venv/share/man/man8, which
# man finds while .venv/bin is on PATH).
set -eu
cd "$(dirname "$0")/.."
if [ -n "${1:-}" ]; then
    dir=$1
elif [ "$(id -u)" = 0 ]; then
    dir=/usr/local/share/man/man8
else
    dir=.venv/share/man/man8
fi
mkdir -p "$dir"
version=$(.venv/bin/python -c 'import usbipy; print(usbipy.__version__)')
for prog in usbipy usbipyd; do
    case $prog in
        usbipy) what="USB/IP client and administration tool (the commands of usbip)" ;;
        usbipyd) what="USB/IP server: export USB devices over TCP" ;;
    esac
    .venv/bin/argparse-manpage --module "usbipy.cli.$prog" --function build_parser \
        --prog "$prog" --manual-section 8 --manual-title "System Administration" \
        --project-name usbipy --version "$version" --description "$what" \
        --url https://pypi.org/project/usbipy/ --output "$dir/$prog.8"
done
if [ -z "${1:-}" ] && [ "$(id -u)" = 0 ] && command -v mandb >/dev/null; then
    mandb -q 2>/dev/null || true  # (for whatis and apropos; man finds the pages without)
fi
