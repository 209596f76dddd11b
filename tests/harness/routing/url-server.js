// Plain node:http routing on the WHATWG URL parser (new URL(req.url, base)), as the Node
// docs show it: the parser reads "\" as "/".
const http = require("node:http");
const areas = ["admin", "secret", "ops", "public"];
const server = http.createServer((req, res) => {
  const path = new URL(req.url, "http://upstream").pathname;
  const area = areas.find((a) => path === `/api/${a}` || path.startsWith(`/api/${a}/`));
  res.writeHead(area ? 200 : 404, { "Content-Type": "text/plain" });
  res.end(area ? `route=${area}\n` : `route=none saw=${path}\n`);
});
server.listen(Number(process.argv[2]), "127.0.0.1", () => console.log("listening"));
process.on("SIGTERM", () => server.close(() => process.exit(0)));
