#!/bin/bash
# Container entrypoint: CANN's own environment script (it may set more than the image ENV for this CANN
# release), a check that the host's driver is mounted, then the command.
set -e
if [ -f "${ASCEND_TOOLKIT_HOME%/latest}/set_env.sh" ]; then
    # shellcheck disable=SC1091
    source "${ASCEND_TOOLKIT_HOME%/latest}/set_env.sh"
fi
if [ ! -d /usr/local/Ascend/driver/lib64 ]; then
    echo "warning: /usr/local/Ascend/driver is not mounted; mount the host driver read-only (see docker/README.md)" >&2
fi
exec "$@"
