# Sourced by `make test`: make the services the tests use available when we can.
#  - PostgreSQL for the store tests (exports ASSISTANT_TEST_PG_URL)
#  - Debian chromium + chromedriver for the browser tests, iproute2 for the offline test
# As root on Debian it installs what is missing; otherwise it uses what is there and the
# tests that need a missing service skip with a reason.
_apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }
  fi
}
command -v chromium >/dev/null && command -v chromedriver >/dev/null || _apt_install chromium chromium-driver
command -v ip >/dev/null || _apt_install iproute2  # the offline test's network namespace
if [ -z "${ASSISTANT_TEST_PG_URL:-}" ] && [ -f .ci/postgres.sh ]; then
  . .ci/postgres.sh && _assistant_started_pg=1
fi

# Stop and remove what this file started; `make test` calls it when the tests end, pass or fail, so
# repeated runs do not leave PostgreSQL servers behind. A server the caller provided is left alone.
assistant_stop_services() {
  [ -n "${_assistant_started_pg:-}" ] || return 0
  assistant_pg_stop
  unset _assistant_started_pg
}
true
