// The grid of candidates: each card waits, then shows previews as they sharpen, then the final image.

import type { Image, Preview } from "./gen/palette/v1/palette_pb";

const EXTENSIONS: Record<string, string> = { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp" };

/** A blob: URL for image bytes; revoked when the card shows something else. */
function objectUrl(data: Uint8Array, mimeType: string): string {
  return URL.createObjectURL(new Blob([data as BlobPart], { type: mimeType }));
}

function slug(text: string): string {
  return text.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 48) || "image";
}

export class Card {
  readonly element: HTMLElement;
  private readonly img: HTMLImageElement;
  private url = "";
  previews = 0;
  score: number | undefined;

  constructor(readonly index: number) {
    this.element = document.createElement("figure");
    this.element.className = "card";
    this.element.dataset.state = "waiting";
    this.element.dataset.index = String(index);
    this.img = document.createElement("img");
    this.img.alt = "";
    this.img.decoding = "async";
  }

  private show(data: Uint8Array, mimeType: string): void {
    const previous = this.url;
    this.url = objectUrl(data, mimeType);
    this.img.src = this.url;
    if (!this.img.isConnected) this.element.prepend(this.img);
    if (previous) URL.revokeObjectURL(previous);
  }

  preview(preview: Preview, imageLength: number): void {
    if (this.element.dataset.state === "final") return;
    this.previews += 1;
    this.show(preview.data, preview.mimeType);
    this.element.dataset.state = "preview";
    this.element.dataset.previews = String(this.previews);
    // Blurred at first, sharper as more of the image's tokens are sampled.
    const left = 1 - preview.tokensDone / Math.max(1, imageLength);
    this.img.style.filter = `blur(${(6 * left).toFixed(1)}px) saturate(${(1 - 0.5 * left).toFixed(2)})`;
    this.img.alt = `image ${this.index + 1}, ${Math.round(100 * (1 - left))} % sampled`;
  }

  final(image: Image, prompt: string): void {
    this.show(image.data, image.mimeType);
    this.img.style.filter = "";
    this.img.alt = `${prompt} (seed ${image.seed})`;
    this.element.dataset.state = "final";
    this.element.dataset.seed = String(image.seed);
    const meta = document.createElement("figcaption");
    meta.className = "meta";
    const label = document.createElement("span");
    label.textContent = `seed ${image.seed}`;
    if (image.hasScore) {
      this.score = image.score;
      this.element.dataset.score = String(image.score);
      label.textContent += ` · score ${image.score.toFixed(2)}`;
    }
    const download = document.createElement("a");
    download.href = this.url;
    download.download = `palette-${slug(prompt)}-${image.seed}.${EXTENSIONS[image.mimeType] ?? "img"}`;
    download.textContent = "Download";
    download.title = "Save this image";
    meta.append(label, download);
    this.element.append(meta);
  }

  ranked(position: number): void {
    const tag = document.createElement("span");
    tag.className = "tag rank";
    tag.textContent = (position === 1 ? "#1 best" : `#${position}`) +
      (this.score === undefined ? "" : ` · ${this.score.toFixed(2)}`);
    tag.title = "Place by CLIP score: how well the image matches the prompt";
    this.element.append(tag);
  }

  dispose(): void {
    if (this.url) URL.revokeObjectURL(this.url);
  }
}

export class Grid {
  private cards: Card[] = [];

  constructor(private readonly element: HTMLElement) {}

  reset(count: number): void {
    for (const card of this.cards) card.dispose();
    this.cards = Array.from({ length: count }, (_, index) => new Card(index));
    this.element.replaceChildren(...this.cards.map((card) => card.element));
  }

  card(index: number): Card | undefined {
    return this.cards[index];
  }

  /** Best first: the cards move into the server's ranked order and get their place. */
  rank(order: readonly number[]): void {
    const cards = order.map((index) => this.cards[index]).filter((card): card is Card => card !== undefined);
    cards.forEach((card, position) => card.ranked(position + 1));
    this.element.replaceChildren(...cards.map((card) => card.element));
  }
}
