# lazyload image: `docker build -t lazyload .` (see deploy/README.md).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin lazyload \
    && cp target/release/lazyload /usr/local/bin/lazyload

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/lazyload /usr/local/bin/lazyload
USER nonroot:nonroot
# admin (/metrics, /healthz, /readyz), access-log collector, xDS relay (plaintext, TLS)
EXPOSE 8081 8082 15010 15012
ENTRYPOINT ["/usr/local/bin/lazyload"]
CMD ["serve", "--config", "/etc/lazyload/config.yaml"]
