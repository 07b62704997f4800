// Palette's page: type a prompt, press Enter, watch the candidates sharpen, best first when ranked.

import { create } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { GenerateRequestSchema, type ModelInfo } from "./gen/palette/v1/palette_pb";
import { describe, palette, setToken, type Problem } from "./api";
import { Grid } from "./grid";

const DEFAULT_IMAGES = 9; // a 3 x 3 grid, as Craiyon shows

function byId<T extends HTMLElement = HTMLElement>(id: string): T {
  const element = document.getElementById(id);
  if (!element) throw new Error(`the page has no #${id}`);
  return element as T;
}

const form = byId<HTMLFormElement>("draw-form");
const promptInput = byId<HTMLInputElement>("prompt");
const promptCount = byId("prompt-count");
const inputs = {
  numImages: byId<HTMLInputElement>("num-images"),
  seed: byId<HTMLInputElement>("seed"),
  temperature: byId<HTMLInputElement>("temperature"),
  topK: byId<HTMLInputElement>("top-k"),
  topP: byId<HTMLInputElement>("top-p"),
  conditionScale: byId<HTMLInputElement>("condition-scale"),
  rank: byId<HTMLInputElement>("rank"),
  previews: byId<HTMLInputElement>("previews"),
};
const status = byId("status");
const barFill = byId("bar-fill");
const statusText = byId("status-text");
const errorBox = byId("error");
const retryButton = byId<HTMLButtonElement>("retry");
const authBar = byId("auth");
const tokenInput = byId<HTMLInputElement>("token");
const summary = byId("summary");
const footer = byId("footer");
const grid = new Grid(byId("grid"));

let info: ModelInfo | undefined;
let running: AbortController | undefined;
let retryTimer: number | undefined;

/** A float32 from the server as a person would write it (1.35, not 1.350000023841858). */
function tidy(value: number): string {
  return String(Number(value.toPrecision(6)));
}

function number(input: HTMLInputElement): number | undefined {
  const value = input.valueAsNumber;
  return Number.isFinite(value) ? value : undefined;
}

// -- the server's defaults and limits ----------------------------------------------------------------

function applyDefaults(): void {
  const limits = info?.limits;
  if (!info || !limits) return;
  inputs.numImages.max = String(limits.maxImagesPerRequest);
  inputs.numImages.value = String(Math.min(DEFAULT_IMAGES, limits.maxImagesPerRequest));
  inputs.seed.value = "";
  inputs.temperature.value = tidy(limits.defaultTemperature);
  inputs.topK.max = String(limits.maxTopK);
  inputs.topK.value = String(limits.defaultTopK);
  inputs.topP.value = "1";
  inputs.conditionScale.value = tidy(limits.defaultConditionScale);
  inputs.rank.checked = info.hasRanker;
  inputs.rank.disabled = !info.hasRanker;
  countPrompt();
}

function describeServer(model: ModelInfo): string {
  const limits = model.limits;
  const sampler = model.stages.find((stage) => stage.kind === "sampler");
  const checkpoint = sampler?.checkpoint.split("/").filter(Boolean).slice(-2).join("/");
  return [
    `Palette ${model.serverVersion}`,
    checkpoint ? `model ${checkpoint}` : "",
    model.devices.join(", "),
    limits ? `${limits.imageWidth}×${limits.imageHeight} images, up to ${limits.maxImagesPerRequest} a request` : "",
    model.hasRanker ? "CLIP ranking" : "no ranker",
  ].filter(Boolean).join(" · ");
}

async function loadInfo(): Promise<void> {
  try {
    info = await palette.getModelInfo({});
    authBar.hidden = true;
    hideProblem();
    applyDefaults();
    footer.textContent = describeServer(info);
  } catch (reason) {
    footer.textContent = "Not connected";
    showProblem(describe(reason));
  }
}

function countPrompt(): void {
  const max = info?.limits?.maxPromptChars ?? 0;
  const length = [...promptInput.value].length;
  promptCount.textContent = max && length > max / 2 ? `${length}/${max}` : "";
  promptCount.classList.toggle("over", max > 0 && length > max);
}

// -- messages -----------------------------------------------------------------------------------------

function hideProblem(): void {
  errorBox.hidden = true;
  retryButton.hidden = true;
  window.clearInterval(retryTimer);
}

function showProblem(problem: Problem): void {
  hideProblem();
  byId("error-title").textContent = problem.title;
  byId("error-text").textContent = problem.text;
  errorBox.hidden = false;
  errorBox.dataset.code = Code[problem.code];
  if (problem.code === Code.Unauthenticated) {
    authBar.hidden = false;
    tokenInput.focus();
  }
  if (problem.code === Code.ResourceExhausted || problem.code === Code.Unavailable) {
    let wait = Math.ceil((problem.retryAfterMs ?? 1000) / 1000);
    retryButton.hidden = false;
    const tick = (): void => {
      retryButton.disabled = wait > 0;
      retryButton.textContent = wait > 0 ? `Try again in ${wait} s` : "Try again";
      wait -= 1;
      if (wait < 0) window.clearInterval(retryTimer);
    };
    tick();
    retryTimer = window.setInterval(tick, 1000);
  }
}

function progress(fraction: number, text: string): void {
  status.hidden = false;
  barFill.style.width = `${(100 * Math.min(1, Math.max(0, fraction))).toFixed(1)}%`;
  statusText.textContent = text;
}

// -- drawing ------------------------------------------------------------------------------------------

function previewEvery(): number {
  const limits = info?.limits;
  if (!inputs.previews.checked || !limits) return 0;
  const step = Math.max(1, limits.chunkSteps);
  return Math.max(step, Math.ceil(limits.imageLength / 4 / step) * step); // about four previews an image
}

async function draw(): Promise<void> {
  running?.abort();
  const controller = new AbortController();
  running = controller;
  hideProblem();
  summary.textContent = "";
  const prompt = promptInput.value;
  const numImages = Math.max(1, Math.round(number(inputs.numImages) ?? DEFAULT_IMAGES));
  const imageLength = info?.limits?.imageLength ?? 1;
  const request = create(GenerateRequestSchema, {
    prompt,
    numImages,
    seed: Math.max(0, Math.round(number(inputs.seed) ?? 0)),
    topK: Math.max(0, Math.round(number(inputs.topK) ?? 0)),
    topP: number(inputs.topP),
    temperature: number(inputs.temperature),
    conditionScale: number(inputs.conditionScale),
    rank: inputs.rank.checked,
    previewEvery: previewEvery(),
  });
  grid.reset(numImages);
  progress(0, "Sending…");
  const started = performance.now();
  let finished = 0;
  try {
    for await (const response of palette.generate(request, { signal: controller.signal })) {
      const event = response.event;
      if (event.case === "progress") {
        const p = event.value;
        const waiting = p.tokensDone === 0 && p.imagesQueued > 0 ? " · waiting for a free sampler row" : "";
        progress(p.tokensDone / Math.max(1, p.tokensTotal),
                 `Drawing · ${finished} of ${numImages} images done${waiting}`);
      } else if (event.case === "preview") {
        grid.card(event.value.index)?.preview(event.value, imageLength);
      } else if (event.case === "image") {
        finished += 1;
        grid.card(event.value.index)?.final(event.value, prompt);
        statusText.textContent = `Drawing · ${finished} of ${numImages} images done`;
      } else if (event.case === "done") {
        const done = event.value;
        if (done.rankedIndices.length) grid.rank(done.rankedIndices);
        const seconds = (performance.now() - started) / 1000;
        summary.textContent = `${finished} images in ${seconds.toFixed(1)} s` +
          (done.rankedIndices.length ? " · best first by CLIP score" : "") + ` · request ${done.requestId}`;
      }
    }
    status.hidden = true;
  } catch (reason) {
    if (running !== controller) return; // a newer drawing replaced this one
    status.hidden = true;
    if (controller.signal.aborted) {
      summary.textContent = `Stopped after ${finished} of ${numImages} images.`;
      return;
    }
    showProblem(describe(reason));
    if (finished === 0) grid.reset(0);
  } finally {
    if (running === controller) running = undefined;
  }
}

// -- wiring -------------------------------------------------------------------------------------------

form.addEventListener("submit", (event) => {
  event.preventDefault();
  void draw();
});
promptInput.addEventListener("input", countPrompt);
byId("stop").addEventListener("click", () => running?.abort());
retryButton.addEventListener("click", () => void draw());
byId("defaults").addEventListener("click", applyDefaults);
byId("token-save").addEventListener("click", () => {
  setToken(tokenInput.value.trim());
  tokenInput.value = "";
  void loadInfo();
});
tokenInput.addEventListener("keydown", (event) => {
  if (event.key === "Enter") byId("token-save").click();
});

const asked = new URLSearchParams(location.search).get("prompt");
if (asked) promptInput.value = asked;
void loadInfo().then(() => {
  if (asked && info) void draw();
});
