// The Palette client for the page: the generated service over Connect (binary), with the token if one is set.

import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";
import { Palette } from "./gen/palette/v1/palette_pb";

const TOKEN_KEY = "palette-token";

export function token(): string {
  return sessionStorage.getItem(TOKEN_KEY) ?? "";
}

export function setToken(value: string): void {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

const withToken: Interceptor = (next) => (request) => {
  const value = token();
  if (value) request.header.set("Authorization", `Bearer ${value}`);
  return next(request);
};

export const palette = createClient(
  Palette,
  createConnectTransport({ baseUrl: "/", useBinaryFormat: true, interceptors: [withToken] }),
);

/** What went wrong, in words for the page; `retryAfterMs` when the server said when to come back. */
export interface Problem {
  title: string;
  text: string;
  code: Code;
  retryAfterMs?: number;
}

export function describe(reason: unknown): Problem {
  const error = ConnectError.from(reason);
  const text = error.rawMessage;
  switch (error.code) {
    case Code.InvalidArgument:
      return { title: "Can't draw that:", text, code: error.code };
    case Code.ResourceExhausted: {
      const retry = Number(error.metadata.get("retry-after-ms") ?? NaN);
      const retryAfterMs = Number.isFinite(retry) ? retry : undefined;
      return { title: "Palette is busy:", text, code: error.code, retryAfterMs }; // the page counts down to a retry
    }
    case Code.Unauthenticated:
      return { title: "This server wants a token:", text, code: error.code };
    case Code.Unavailable:
      return { title: "The server is not taking work right now:", text, code: error.code };
    case Code.DeadlineExceeded:
      return { title: "That took too long:", text, code: error.code };
    case Code.Canceled:
      return { title: "Stopped.", text: "", code: error.code };
    case Code.Unknown:
    case Code.Unimplemented:
      return { title: "Can't reach the Palette server:", text, code: error.code };
    default:
      return { title: "Something went wrong:", text, code: error.code };
  }
}
