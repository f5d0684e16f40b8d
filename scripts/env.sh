# Source this file: the environment r2f builds and runs in (libtorch from the project's
# virtualenv, made by scripts/setup.sh).
_r2f_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export R2F_VENV=${R2F_VENV:-$_r2f_root/.venv}
export VIRTUAL_ENV=$R2F_VENV
export PATH=$R2F_VENV/bin:$PATH
# torch-sys asks the virtualenv's python where libtorch is (include, lib, C++ ABI).
export LIBTORCH_USE_PYTORCH=1
_r2f_torch_lib=$("$R2F_VENV/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)
if [ -n "$_r2f_torch_lib" ]; then
  export LD_LIBRARY_PATH=$_r2f_torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
unset _r2f_root _r2f_torch_lib
# The cargo profile the scripts build their `r2f` binary with: `release` (default) or `dev`.
# `R2F_PROFILE=dev` reuses what scripts/test.sh compiled, so the dependencies are not compiled
# a second time (the dev profile optimises dependencies too; the tensor work is libtorch's).
export R2F_PROFILE=${R2F_PROFILE:-release}
# The path of the `r2f` binary of $R2F_PROFILE.
r2f_bin() {
  local dir=$R2F_PROFILE
  [ "$dir" = dev ] && dir=debug
  echo "${CARGO_TARGET_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target}/$dir/r2f"
}
# Prints the configuration of a worker on the local services with queue names of its own
# (`NAME.route`, `NAME.inbox`, `NAME.jobs`, `NAME.dead`, `NAME.retry`, `NAME.events`), local-folder
# storage and the LLM off:
#   r2f_worker_toml NAME MODEL SOURCE STORAGE_DIR METRICS_LISTEN ['key = value' of [worker] ...]
r2f_worker_toml() {
  local name=$1 model=$2 source=$3 storage=$4 listen=$5
  shift 5
  printf '[models.%s]\nsource = "%s"\n[worker]\nmodel = "%s"\n' "$model" "$source" "$model"
  local line
  for line in "$@"; do printf '%s\n' "$line"; done
  cat <<TOML
[amqp]
jobs_exchange = "$name.route"
inbox_queue = "$name.inbox"
jobs_queue = "$name.jobs"
dead_letter_queue = "$name.dead"
retry_queue = "$name.retry"
events_exchange = "$name.events"
[storage]
backend = "local"
local_dir = "$storage"
[llm]
enabled = false
[metrics]
listen = "$listen"
TOML
}
