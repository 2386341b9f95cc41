// A Node app with no mesh code: GET / answers what `fetch("http://backend:9080/")` got.
// Node reaches `backend` only through its sidecar (HTTP_PROXY + NODE_USE_ENV_PROXY=1).
import http from "node:http";

http.createServer(async (req, res) => {
  try {
    const r = await fetch("http://backend:9080/");
    res.writeHead(200, { "content-type": "text/plain" });
    res.end(`${r.status} ${await r.text()}`);
  } catch (e) {
    res.writeHead(502, { "content-type": "text/plain" });
    res.end(`fetch failed: ${e.cause ?? e}`);
  }
}).listen(Number(process.env.PORT), "127.0.0.1");
