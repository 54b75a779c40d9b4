# The gateway image: slim Python, non-root, port 443.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10443 --home-dir /var/lib/join-gateway --create-home gateway
COPY --from=build /install /usr/local
COPY config/gateway.yaml /etc/join-gateway/gateway.yaml
COPY config/token.yaml /etc/join-gateway/tokens/token.yaml
# Binding 443 as non-root: the capability on the interpreter, not root.
RUN apt-get update && apt-get install -y --no-install-recommends libcap2-bin \
    && setcap 'cap_net_bind_service=+ep' "$(readlink -f /usr/local/bin/python3)" \
    && apt-get purge -y libcap2-bin && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*
USER gateway
EXPOSE 443
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD python3 -c "import ssl,urllib.request; urllib.request.urlopen('https://127.0.0.1:443/healthz', context=ssl._create_unverified_context(), timeout=2)" || exit 1
ENTRYPOINT ["join-gateway", "serve"]
CMD ["--config", "/etc/join-gateway/gateway.yaml"]
