/**
 * Test support: an HTTP proxy in front of an edge that refuses every WebSocket upgrade
 * (as some corporate proxies do) and passes plain requests through, streaming — so an
 * event stream works and a WebSocket does not.
 */

import { createServer, request, type Server } from "node:http";
import type { AddressInfo } from "node:net";

export class NoUpgradeProxy {
  refused = 0;
  private constructor(readonly server: Server) {}

  static start(target: string): Promise<NoUpgradeProxy> {
    const to = new URL(target);
    const server = createServer((req, res) => {
      const up = request(
        { host: to.hostname, port: to.port, path: req.url, method: req.method, headers: req.headers },
        (r) => {
          res.writeHead(r.statusCode ?? 502, r.headers);
          r.pipe(res);
        },
      );
      up.on("error", () => res.destroy());
      res.on("close", () => up.destroy());
      req.pipe(up);
    });
    const proxy = new NoUpgradeProxy(server);
    server.on("upgrade", (_req, socket) => {
      proxy.refused++;
      socket.end("HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    });
    return new Promise((ok) => server.listen(0, "127.0.0.1", () => ok(proxy)));
  }

  get url(): string {
    return `ws://127.0.0.1:${(this.server.address() as AddressInfo).port}/ws`;
  }

  stop(): Promise<void> {
    this.server.closeAllConnections();
    return new Promise((ok) => this.server.close(() => ok()));
  }
}
