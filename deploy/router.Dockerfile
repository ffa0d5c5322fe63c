# sglang-router (a Rust binary with a Python launcher) for deploy/k8s: the version whose flags
# the manifests use (tests/test_deploy_manifests.py parses them with this version's parser).
#   docker build -f deploy/router.Dockerfile -t minisgl-router:0.3.2 deploy
FROM python:3.12-slim
ARG SGLANG_ROUTER_VERSION=0.3.2
RUN pip install --no-cache-dir "sglang-router==${SGLANG_ROUTER_VERSION}"
# an unprivileged user (the Deployment runs it as 65532 with a read-only root filesystem)
USER 65532:65532
EXPOSE 30000 29000
ENTRYPOINT ["python", "-m", "sglang_router.launch_router"]
