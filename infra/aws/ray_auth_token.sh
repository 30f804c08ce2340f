#!/usr/bin/env bash
# Run (not sourced) by the start commands in infra/aws/cluster.yaml on every node, before
# `ray start`: writes the cluster's Ray auth token to ~/.ray/auth_token, where Ray 2.60 looks
# for it (RAY_AUTH_MODE=token is set for the whole container by docker run_options). The token
# lives in SSM Parameter Store as a SecureString (RAY_AUTH_TOKEN_PARAMETER), read with the
# node's instance profile, so it is in no file of the repository and no command line.
# Clients (ray job submit, the dashboard) use the same token: infra/README.md.
set -euo pipefail
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-west-2}"
parameter="${RAY_AUTH_TOKEN_PARAMETER:-/vit-register-sweeps/ray-auth-token}"
umask 077
mkdir -p "$HOME/.ray"
python -c 'import sys, boto3; print(boto3.client("ssm").get_parameter(Name=sys.argv[1], WithDecryption=True)["Parameter"]["Value"])' \
  "$parameter" >"$HOME/.ray/auth_token.new" || {
  rm -f "$HOME/.ray/auth_token.new"
  echo "ray_auth_token.sh: cannot read SSM parameter $parameter; create it (infra/README.md) and allow ssm:GetParameter on it" >&2
  exit 1
}
mv "$HOME/.ray/auth_token.new" "$HOME/.ray/auth_token"
