// Express: the usual way a Node app mounts its areas (app.use, case-insensitive by default).
const express = require("express");
const app = express();
for (const area of ["admin", "secret", "ops", "public"]) {
  app.use(`/api/${area}`, (req, res) => res.type("text/plain").send(`route=${area}\n`));
}
app.use((req, res) => res.status(404).type("text/plain").send(`route=none saw=${req.path}\n`));
const server = app.listen(Number(process.argv[2]), "127.0.0.1", () => console.log("listening"));
process.on("SIGTERM", () => server.close(() => process.exit(0)));
