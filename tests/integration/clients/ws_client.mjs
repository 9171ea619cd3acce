// The official TypeScript SDK's WebSocketClientTransport against a bridge:
// connect, list the tools, call echo; print one JSON line of what it saw.
//
// Usage: node ws_client.mjs SDK_DIR URL MESSAGE
// SDK_DIR is @modelcontextprotocol/sdk's directory in tests/node/node_modules
// (imported by path: this script lives outside that tree).
import { pathToFileURL } from "node:url";
import { join } from "node:path";

const [sdk, url, message] = process.argv.slice(2);
const load = (path) => import(pathToFileURL(join(sdk, "dist", "esm", path)).href);
const { Client } = await load("client/index.js");
const { WebSocketClientTransport } = await load("client/websocket.js");

const client = new Client({ name: "ws-client", version: "1.0.0" });
const transport = new WebSocketClientTransport(new URL(url));
await client.connect(transport);
const tools = await client.listTools();
const called = await client.callTool({ name: "echo", arguments: { message } });
const server = client.getServerVersion();
await client.close();
console.log(
  JSON.stringify({
    server: server?.name,
    protocol: transport.protocol ?? null,
    tools: tools.tools.map((t) => t.name),
    echo: called.content.map((c) => c.text).join(""),
  }),
);
