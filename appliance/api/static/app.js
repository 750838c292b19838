// Live view: webcam or a local video -> JPEG frames over /ws/stream -> boxes drawn on top.
// No build step: plain browser JavaScript.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const video = $("video");
  const view = $("view");
  const ctx = view.getContext("2d");
  // Frames are captured at most this wide: the detector works at 640 px anyway.
  const MAX_CAPTURE_WIDTH = 640;
  // At most this many frames without a result in flight; the server keeps only the newest
  // waiting frame, so sending more would only add latency.
  const MAX_IN_FLIGHT = 2;
  // A frame the server dropped never gets a result: stop waiting for it after this long.
  const IN_FLIGHT_TIMEOUT_MS = 1000;
  const LATENCY_WINDOW = 200;

  const capture = document.createElement("canvas");
  const captureCtx = capture.getContext("2d");

  // Page hook: tests (and curious users in the console) read the live state here.
  const live = {
    connected: false,
    closeCode: null,
    closeReason: "",
    sent: 0,
    results: 0,
    lastResult: null,
    serverStats: null,
    status: null,
    latenciesMs: [],
    frameSize: null,
    error: null,
    labels: [], // the text drawn over each face of the last drawn result
  };
  window.liveView = live;

  let ws = null;
  let stream = null;
  let timer = null;
  let statsTimer = null;
  let seq = 0;
  let lastResultSeq = 0;
  let lastResultAt = 0;
  const sentAt = new Map();
  const rate = { sent: [], results: [] };

  function setMessage(text) { $("message").textContent = text; }

  function setConnection(text, cls) {
    const el = $("connection");
    el.textContent = text;
    el.className = "badge " + cls;
  }

  function percentile(values, q) {
    if (!values.length) return null;
    const sorted = [...values].sort((a, b) => a - b);
    const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((q / 100) * sorted.length) - 1));
    return sorted[i];
  }

  function fpsOf(times) {
    const now = performance.now();
    while (times.length && now - times[0] > 2000) times.shift();
    return times.length / 2;
  }

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const token = $("token").value.trim();
    // Browsers cannot set an Authorization header on a WebSocket: the token goes in the query.
    const query = token ? "?token=" + encodeURIComponent(token) : "";
    return `${scheme}://${location.host}/ws/stream${query}`;
  }

  async function openSource() {
    const source = document.querySelector("input[name=source]:checked").value;
    if (source === "webcam") {
      stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
      video.srcObject = stream;
    } else {
      const file = $("file").files[0];
      if (!file) throw new Error("choose a video file first");
      video.srcObject = null;
      video.src = URL.createObjectURL(file);
      video.loop = true;
    }
    video.muted = true;
    await video.play();
  }

  function closeSource() {
    if (stream) stream.getTracks().forEach((t) => t.stop());
    stream = null;
    video.pause();
  }

  function config() {
    return {
      type: "config",
      max_fps: Number($("fps").value) || 10,
      threshold: Number($("threshold").value),
      return_landmarks: $("landmarks").checked,
      extract_embedding: $("embeddings").checked,
      identify: $("identify").checked,
    };
  }

  function connect() {
    return new Promise((resolve, reject) => {
      ws = new WebSocket(socketUrl());
      ws.binaryType = "arraybuffer";
      ws.onopen = () => {
        live.connected = true;
        setConnection("connected", "open");
        ws.send(JSON.stringify(config()));
        resolve();
      };
      ws.onmessage = (event) => onMessage(JSON.parse(event.data));
      ws.onerror = () => reject(new Error("WebSocket error (wrong token?)"));
      ws.onclose = (event) => {
        live.connected = false;
        live.closeCode = event.code;
        live.closeReason = event.reason;
        setConnection(`closed ${event.code}`, "closed");
        setMessage(event.reason ? `Stream closed: ${event.reason}` : `Stream closed (${event.code})`);
        stop(false);
      };
    });
  }

  function onMessage(msg) {
    if (msg.type === "result") {
      live.results += 1;
      live.lastResult = msg;
      lastResultSeq = Math.max(lastResultSeq, msg.seq);
      lastResultAt = performance.now();
      rate.results.push(lastResultAt);
      const sent = sentAt.get(msg.seq);
      if (sent !== undefined) {
        live.latenciesMs.push(lastResultAt - sent);
        if (live.latenciesMs.length > LATENCY_WINDOW) live.latenciesMs.shift();
      }
      for (const key of sentAt.keys()) if (key <= msg.seq) sentAt.delete(key);
    } else if (msg.type === "stats") {
      live.serverStats = msg;
    } else if (msg.type === "status") {
      live.status = msg;
      const el = $("governor");
      el.textContent = `governor: ${msg.state}`;
      el.className = `badge state-${msg.state}`;
    } else if (msg.type === "error") {
      setMessage(`Frame ${msg.seq}: ${msg.error}`);
    }
    renderStats();
  }

  function renderStats() {
    const p50 = percentile(live.latenciesMs, 50);
    const p99 = percentile(live.latenciesMs, 99);
    $("stat-sent").textContent = live.sent;
    $("stat-results").textContent = live.results;
    $("stat-send-fps").textContent = fpsOf(rate.sent).toFixed(1);
    $("stat-fps").textContent = fpsOf(rate.results).toFixed(1);
    $("stat-latency").textContent = p50 === null ? "-" : `${p50.toFixed(0)} / ${p99.toFixed(0)} ms`;
    $("stat-dropped").textContent = live.serverStats ? live.serverStats.dropped : 0;
    $("stat-faces").textContent = live.lastResult ? live.lastResult.faces.length : "-";
    $("stat-max-fps").textContent = live.status ? live.status.max_fps : "-";
  }

  function sendFrame() {
    if (!ws || ws.readyState !== WebSocket.OPEN || !video.videoWidth) return;
    const now = performance.now();
    const waiting = seq - lastResultSeq;
    const stale = now - Math.max(lastResultAt, sentAt.get(seq) || 0) > IN_FLIGHT_TIMEOUT_MS;
    if (waiting >= MAX_IN_FLIGHT && !stale) return;
    const k = Math.min(1, MAX_CAPTURE_WIDTH / video.videoWidth);
    capture.width = Math.round(video.videoWidth * k);
    capture.height = Math.round(video.videoHeight * k);
    captureCtx.drawImage(video, 0, 0, capture.width, capture.height);
    live.frameSize = [capture.width, capture.height];
    seq += 1;
    const mySeq = seq;
    sentAt.set(mySeq, now);
    capture.toBlob((blob) => {
      if (!blob || !ws || ws.readyState !== WebSocket.OPEN) return;
      ws.send(JSON.stringify({ type: "frame", seq: mySeq, ts: Date.now() }));
      ws.send(blob);
      live.sent += 1;
      rate.sent.push(performance.now());
    }, "image/jpeg", 0.8);
  }

  function draw() {
    if (video.videoWidth) {
      const k = Math.min(1, MAX_CAPTURE_WIDTH / video.videoWidth);
      const w = Math.round(video.videoWidth * k);
      const h = Math.round(video.videoHeight * k);
      if (view.width !== w || view.height !== h) { view.width = w; view.height = h; }
      ctx.drawImage(video, 0, 0, w, h);
      drawFaces(live.lastResult);
    }
    if (ws) requestAnimationFrame(draw);
  }

  function drawFaces(result) {
    if (!result) return;
    // Results are in capture-canvas pixels, and the view canvas has the same size.
    const line = Math.max(2, view.width / 320);
    ctx.lineWidth = line;
    ctx.font = `${Math.round(6 * line + 4)}px system-ui, sans-serif`;
    live.labels = [];
    for (const face of result.faces) {
      const [x1, y1, x2, y2] = face.bbox;
      ctx.strokeStyle = "#00e5ff";
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      // With identify: the subject's name (or "unknown") and its track, else the score.
      const label =
        "track_id" in face
          ? `${face.identity ?? "unknown"} #${face.track_id}`
          : face.prob.toFixed(2);
      live.labels.push(label);
      const tw = ctx.measureText(label).width + 6;
      ctx.fillStyle = "#00e5ff";
      ctx.fillRect(x1, Math.max(0, y1 - 6 * line - 8), tw, 6 * line + 8);
      ctx.fillStyle = "#000";
      ctx.fillText(label, x1 + 3, Math.max(6 * line + 2, y1 - 4));
      if (face.landmarks) {
        ctx.fillStyle = "#ff4d6d";
        for (const [x, y] of face.landmarks) {
          ctx.beginPath();
          ctx.arc(x, y, line + 1, 0, 2 * Math.PI);
          ctx.fill();
        }
      }
    }
  }

  async function start() {
    $("start").disabled = true;
    live.error = null;
    setMessage("");
    try {
      await openSource();
      await connect();
    } catch (err) {
      live.error = String(err.message || err);
      setMessage(live.error);
      stop(true);
      return;
    }
    $("stop").disabled = false;
    const fps = Number($("fps").value) || 10;
    timer = setInterval(sendFrame, 1000 / fps);
    statsTimer = setInterval(renderStats, 500);
    requestAnimationFrame(draw);
  }

  function stop(closeSocket) {
    if (timer) clearInterval(timer);
    if (statsTimer) clearInterval(statsTimer);
    timer = statsTimer = null;
    if (closeSocket && ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, "stopped");
    ws = null;
    closeSource();
    $("start").disabled = false;
    $("stop").disabled = true;
  }

  for (const radio of document.querySelectorAll("input[name=source]")) {
    radio.addEventListener("change", () => { $("file").disabled = radio.value !== "file" || !radio.checked; });
  }
  $("start").addEventListener("click", start);
  $("stop").addEventListener("click", () => stop(true));

  // ?token=...&fps=...&autostart=1 prefill the form (bookmarks, kiosks, tests).
  const params = new URLSearchParams(location.search);
  if (params.has("token")) $("token").value = params.get("token");
  if (params.has("fps")) $("fps").value = params.get("fps");
  if (params.get("identify") === "1") $("identify").checked = true;
  if (params.get("autostart") === "1") start();
})();
