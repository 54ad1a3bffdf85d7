# Helpers for the guest-side test scripts (run by dash in the guest).
pass=0
fail=0

check() {
    desc=$1
    shift
    if "$@"; then
        echo "ok: $desc"
        pass=$((pass + 1))
    else
        echo "FAIL: $desc"
        fail=$((fail + 1))
    fi
}

eq() {
    [ "$1" = "$2" ] && return 0
    echo "  expected '$2', got '$1'"
    return 1
}

# True if COUNT MiB at OFFSET MiB of DEV read back as zeroes.
zeroes_at() {
    n=$(dd if="$1" bs=1M skip="$2" count="$3" iflag=direct 2>/dev/null | tr -d '\000' | wc -c)
    eq "$n" 0
}

finish() {
    echo "guest: $pass passed, $fail failed"
    [ "$fail" -eq 0 ]
}
