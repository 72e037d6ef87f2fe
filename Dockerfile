# envgate container image.
#
#   docker build -t envgate .
#   docker run --rm -p 8889:8889 -e ENVGATE_UPSTREAM=http://eg:8888 envgate
#
# docker-compose.yml runs it next to Enterprise Gateway.

# ---- build -----------------------------------------------------------------
# Pinned to the toolchain the project is developed and tested with. Bookworm
# is Debian 12, whose glibc the distroless runtime below ships, so the binary
# runs there unchanged.
FROM rust:1.95.0-bookworm AS build
WORKDIR /src

# Dependencies get their own layer, rebuilt only when Cargo.toml or Cargo.lock
# change, not on every source edit: build them once against a stub main.rs and
# an empty lib.rs (Cargo.toml declares both targets).
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

COPY src ./src
# COPY keeps the sources' modification times, which are older than the stub's
# build output: touch them so cargo does not take the stub binary as fresh.
RUN find src -name '*.rs' -exec touch {} + \
 && cargo build --release --locked \
 && install -D -m 0755 target/release/envgate /out/envgate

# ---- runtime ---------------------------------------------------------------
# glibc and libgcc only (envgate links no OpenSSL), no shell, no package
# manager. For reproducible deployments pin the digest as well:
#   FROM gcr.io/distroless/cc-debian12:nonroot@sha256:...
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/envgate /usr/local/bin/envgate
# The image's "nonroot" user, by number so that Kubernetes' runAsNonRoot
# can verify it without a passwd lookup.
USER 65532:65532
EXPOSE 8889
ENTRYPOINT ["/usr/local/bin/envgate"]
# Inside a container envgate must listen on all interfaces, not loopback.
# Arguments given to `docker run IMAGE ...` replace this whole list.
CMD ["--listen", "0.0.0.0:8889"]
