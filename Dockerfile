# fanout: the edge and the publish CLI in a small non-root image.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p fanout-edge -p fanout-publisher

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home fanout
COPY --from=build /src/target/release/fanout-edge /usr/local/bin/fanout-edge
COPY --from=build /src/target/release/fanout-publish /usr/local/bin/fanout-publish
USER 10001
EXPOSE 8080
ENV FANOUT_LISTEN=0.0.0.0:8080 FANOUT_LOG_FORMAT=json
ENTRYPOINT ["/usr/local/bin/fanout-edge"]
