#!/bin/sh
# The MLflow tracking server with its basic-auth app. Writes the auth config (infra/mlflow/basic_auth.ini plus
# `database_uri` from MLFLOW_AUTH_DATABASE_URI, which holds a password and so lives only in the environment)
# to a private file, then runs `mlflow server --app-name basic-auth` with the arguments given.
#
#   MLFLOW_AUTH_DATABASE_URI=postgresql+psycopg://USER:PASSWORD@HOST:5432/mlflow_auth \
#   MLFLOW_AUTH_ADMIN_USERNAME=admin MLFLOW_AUTH_ADMIN_PASSWORD=... MLFLOW_FLASK_SERVER_SECRET_KEY=... \
#   serve.sh --backend-store-uri ... --host 0.0.0.0 --port 5000
set -eu
: "${MLFLOW_AUTH_DATABASE_URI:?the auth database URL}"
: "${MLFLOW_AUTH_ADMIN_USERNAME:?the admin user MLflow creates on first start}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?its password}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?the CSRF secret, the same on every MLflow replica}"
template="${MLFLOW_AUTH_TEMPLATE:-$(dirname "$0")/basic_auth.ini}"
config="${MLFLOW_AUTH_CONFIG_PATH:-${TMPDIR:-/tmp}/mlflow-auth/basic_auth.ini}"
umask 077
mkdir -p "$(dirname "$config")"
# configparser interpolates '%': a URL-encoded password (%40 ...) must be written as %%.
{ cat "$template"; printf 'database_uri = %s\n' "$(printf '%s' "$MLFLOW_AUTH_DATABASE_URI" | sed 's/%/%%/g')"; } > "$config"
export MLFLOW_AUTH_CONFIG_PATH="$config"
exec mlflow server --app-name basic-auth "$@"
