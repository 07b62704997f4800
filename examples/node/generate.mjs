// Generate images with Palette from Node.js: gRPC over TLS, with a bearer token.
//
//   npm ci
//   PALETTE_TOKEN=... node generate.mjs 127.0.0.1:50051 ca.pem "a red circle" out/
//
// The server was started with  palette serve --tls-cert server.crt --tls-key server.key --auth-tokens tokens
// (ca.pem is the CA that signed server.crt). Every field is documented in palette.proto.
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const [target, caFile, prompt, outDir = "out"] = process.argv.slice(2);
const here = dirname(fileURLToPath(import.meta.url));
const definition = protoLoader.loadSync(join(here, "../../protos/palette/v1/palette.proto"), {
  keepCase: true, longs: Number, enums: String, defaults: true,
});
const { palette } = grpc.loadPackageDefinition(definition);

// TLS that trusts our CA, plus the token on every call.
const token = process.env.PALETTE_TOKEN;
const credentials = grpc.credentials.combineChannelCredentials(
  grpc.credentials.createSsl(readFileSync(caFile)),
  grpc.credentials.createFromMetadataGenerator((_params, callback) => {
    const metadata = new grpc.Metadata();
    metadata.set("authorization", `Bearer ${token}`);
    callback(null, metadata);
  }),
);
const client = new palette.v1.Palette(target, credentials);

mkdirSync(outDir, { recursive: true });
const call = client.Generate({ prompt, num_images: 2, seed: 7, rank: true });
call.on("data", (response) => {
  if (response.image) {
    const { index, seed, score, data } = response.image;
    const path = join(outDir, `${index}-seed${seed}.png`);
    writeFileSync(path, data);
    console.log(`wrote ${path} score ${score.toFixed(3)}`);
  } else if (response.done) {
    console.log(`best first: ${response.done.ranked_indices.join(", ")}`);
  }
});
call.on("error", (err) => {
  console.error(`${grpc.status[err.code]}: ${err.details}`);
  process.exitCode = 1;
});
call.on("end", () => client.close());
