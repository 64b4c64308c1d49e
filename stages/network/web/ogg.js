// Ogg paging for Opus (RFC 3533 pages, RFC 7845 Ogg Opus): the page's writer for its microphone and its
// reader for the server's answers. Used by mic.js and player.js; no dependencies.

const CRC_TABLE = (() => {
  // Ogg's CRC-32: polynomial 0x04c11db7, not reflected, initial value 0, no final xor
  const table = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let r = i << 24;
    for (let k = 0; k < 8; k++) r = r & 0x80000000 ? (r << 1) ^ 0x04c11db7 : r << 1;
    table[i] = r >>> 0;
  }
  return table;
})();

export function oggCrc32(bytes) {
  let crc = 0;
  for (let i = 0; i < bytes.length; i++) crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ bytes[i]) & 0xff]) >>> 0;
  return crc >>> 0;
}

const FLAG_CONTINUED = 0x01;
const FLAG_FIRST = 0x02;
const FLAG_LAST = 0x04;
export const GRANULE_RATE = 48000; // Ogg Opus counts granule positions at 48 kHz whatever the input rate

/** Writes one logical Ogg Opus stream: `headers()` once, then `page(packets, samples48k)` per page. */
export class OggOpusWriter {
  constructor({ inputSampleRate = 24000, channels = 1, preSkip = 312 } = {}) {
    this.serial = (Math.random() * 0xffffffff) >>> 0;
    this.sequence = 0;
    this.granule = 0; // 48 kHz samples written so far
    this.inputSampleRate = inputSampleRate;
    this.channels = channels;
    this.preSkip = preSkip;
  }

  /** The OpusHead page (first of the stream) and the OpusTags page, as one byte array. */
  headers() {
    const head = new Uint8Array(19);
    const view = new DataView(head.buffer);
    head.set(ascii("OpusHead"), 0);
    head[8] = 1; // version
    head[9] = this.channels;
    view.setUint16(10, this.preSkip, true);
    view.setUint32(12, this.inputSampleRate, true);
    view.setInt16(16, 0, true); // output gain
    head[18] = 0; // channel mapping family 0: mono or stereo, no table
    const vendor = ascii("rtpipe web page");
    const tags = new Uint8Array(8 + 4 + vendor.length + 4);
    const tagsView = new DataView(tags.buffer);
    tags.set(ascii("OpusTags"), 0);
    tagsView.setUint32(8, vendor.length, true);
    tags.set(vendor, 12);
    tagsView.setUint32(12 + vendor.length, 0, true); // no comments
    return concat([this._page([head], 0, FLAG_FIRST), this._page([tags], 0, 0)]);
  }

  /** One page holding `packets` (Uint8Array each) that together hold `samples48k` samples at 48 kHz. */
  page(packets, samples48k, last = false) {
    this.granule += samples48k;
    return this._page(packets, this.granule, last ? FLAG_LAST : 0);
  }

  _page(packets, granule, flags) {
    const lacing = [];
    for (const p of packets) {
      let n = p.length;
      while (n >= 255) {
        lacing.push(255);
        n -= 255;
      }
      lacing.push(n); // a packet whose length is a multiple of 255 ends with a 0
    }
    if (lacing.length > 255) throw new Error(`an Ogg page holds at most 255 segments, not ${lacing.length}`);
    const bodyLength = packets.reduce((sum, p) => sum + p.length, 0);
    const page = new Uint8Array(27 + lacing.length + bodyLength);
    const view = new DataView(page.buffer);
    page.set(ascii("OggS"), 0);
    page[4] = 0; // stream structure version
    page[5] = flags;
    view.setBigUint64(6, BigInt(granule), true);
    view.setUint32(14, this.serial, true);
    view.setUint32(18, this.sequence++, true);
    view.setUint32(22, 0, true); // the CRC, computed over the page with this field zero
    page[26] = lacing.length;
    page.set(lacing, 27);
    let at = 27 + lacing.length;
    for (const p of packets) {
      page.set(p, at);
      at += p.length;
    }
    view.setUint32(22, oggCrc32(page), true);
    return page;
  }
}

/** Reads a byte stream of Ogg pages (any split across messages) into packets: `push(bytes)` returns the
 *  packets completed by these bytes, each {data: Uint8Array, granule: number (of its page)}. */
export class OggReader {
  constructor() {
    this.buffer = new Uint8Array(0);
    this.partial = []; // pieces of a packet continued on the next page
    this.pages = 0;
    this.badPages = 0;
  }

  push(bytes) {
    this.buffer = concat([this.buffer, bytes]);
    const packets = [];
    for (;;) {
      const start = findCapture(this.buffer);
      if (start < 0) {
        this.buffer = this.buffer.slice(Math.max(0, this.buffer.length - 3)); // "OggS" may straddle
        return packets;
      }
      if (start > 0) this.buffer = this.buffer.slice(start);
      if (this.buffer.length < 27) return packets;
      const segments = this.buffer[26];
      if (this.buffer.length < 27 + segments) return packets;
      const lacing = this.buffer.subarray(27, 27 + segments);
      const bodyLength = lacing.reduce((sum, n) => sum + n, 0);
      const end = 27 + segments + bodyLength;
      if (this.buffer.length < end) return packets;
      const page = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end);
      const view = new DataView(page.buffer);
      const crc = view.getUint32(22, true);
      view.setUint32(22, 0, true);
      if (oggCrc32(page) !== crc) {
        this.badPages++; // a corrupt page: skip it, keep reading
        this.partial = [];
        continue;
      }
      this.pages++;
      const granule = Number(view.getBigUint64(6, true));
      if (!(page[5] & FLAG_CONTINUED)) this.partial = [];
      let at = 27 + segments;
      for (const n of lacing) {
        this.partial.push(page.subarray(at, at + n));
        at += n;
        if (n < 255) {
          packets.push({ data: concat(this.partial), granule });
          this.partial = [];
        }
      }
    }
  }
}

function findCapture(bytes) {
  for (let i = 0; i + 3 < bytes.length; i++) {
    if (bytes[i] === 0x4f && bytes[i + 1] === 0x67 && bytes[i + 2] === 0x67 && bytes[i + 3] === 0x53) return i;
  }
  return -1;
}

export function ascii(text) {
  return Uint8Array.from(text, (c) => c.charCodeAt(0));
}

export function concat(arrays) {
  const out = new Uint8Array(arrays.reduce((sum, a) => sum + a.length, 0));
  let at = 0;
  for (const a of arrays) {
    out.set(a, at);
    at += a.length;
  }
  return out;
}
