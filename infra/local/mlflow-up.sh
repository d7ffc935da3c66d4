#!/usr/bin/env bash
# A light local MLflow tracking server on 127.0.0.1 for the UI (the jobs default to sqlite:///mlflow.db
# and need no server). Runs in the foreground; point jobs at it with tracking.uri or
# MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT.
#   MLFLOW_PORT (default 5000)  MLFLOW_DB (default ./mlflow.db)  MLFLOW_ARTIFACTS (default ./mlartifacts)
set -euo pipefail
PORT=${MLFLOW_PORT:-5000}
DB=${MLFLOW_DB:-$PWD/mlflow.db}
ART=${MLFLOW_ARTIFACTS:-$PWD/mlartifacts}
mkdir -p "$ART"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec env --default-signal=INT,TERM "${MLFLOW:-mlflow}" server --workers 1 --host 127.0.0.1 --port "$PORT" \
  --backend-store-uri "sqlite:///$DB" --artifacts-destination "$ART"
