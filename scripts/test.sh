#!/usr/bin/env bash
# Sets up .venv if needed, then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The DICOM tests run a real Orthanc with its DICOMweb plugin and dciodvfy (dicom3tools): Debian packages,
# installed here when missing and this is root (as in CI, where those tests fail, never skip, without them).
if [ ! -x /usr/sbin/Orthanc ] || [ ! -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || [ ! -x /usr/bin/dciodvfy ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb \
            dicom3tools >/dev/null) || echo "could not install orthanc, orthanc-dicomweb, dicom3tools" >&2
    else
        echo "orthanc, orthanc-dicomweb or dicom3tools missing (apt-get install them as root): DICOMweb tests skip" >&2
    fi
fi
exec .venv/bin/python -m pytest -q "$@"
