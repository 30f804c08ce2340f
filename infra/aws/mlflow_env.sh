# Sourced (not run) by the cluster's start commands in infra/aws/cluster.yaml:
#   . infra/aws/mlflow_env.sh head|worker
# Exports where MLflow is and how to sign in, so `ray start` hands it to every driver
# and trial. The password lives in SSM Parameter Store as a SecureString
# (MLFLOW_PASSWORD_PARAMETER) and is read with the node's instance profile.
_role="${1:?usage: . mlflow_env.sh head|worker}"
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-west-2}"
_parameter="${MLFLOW_PASSWORD_PARAMETER:-/vit-register-sweeps/mlflow-admin-password}"
if [ "$_role" = head ]; then
  _mlflow_host="$(hostname -I | awk '{print $1}')"
else
  _mlflow_host="${RAY_HEAD_IP:?RAY_HEAD_IP is set by Ray on worker nodes}"
fi
export MLFLOW_TRACKING_URI="http://${_mlflow_host}:5000"
export MLFLOW_TRACKING_USERNAME="${MLFLOW_TRACKING_USERNAME:-admin}"
MLFLOW_TRACKING_PASSWORD="$(python -c 'import sys, boto3; print(boto3.client("ssm").get_parameter(Name=sys.argv[1], WithDecryption=True)["Parameter"]["Value"])' "$_parameter")" || {
  echo "mlflow_env.sh: cannot read SSM parameter $_parameter; create it (infra/README.md) and allow ssm:GetParameter on it" >&2
  return 1 2>/dev/null || exit 1
}
export MLFLOW_TRACKING_PASSWORD
# The server on the head creates its admin user from this on first start.
export MLFLOW_AUTH_ADMIN_USERNAME="$MLFLOW_TRACKING_USERNAME"
export MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD"
unset _role _parameter _mlflow_host
