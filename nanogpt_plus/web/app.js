// The page of `nanogpt-plus serve`: stream a completion from /v1/completions, shade each token by its probability,
// then draw one layer's and head's attention over the whole text from /v1/attention. Plain JavaScript, no build step.
"use strict";
const $ = (id) => document.getElementById(id);
let modelId = null, lastText = "";

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("api_key").value) h["Authorization"] = "Bearer " + $("api_key").value;
  return h;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

async function connect() {
  const health = await (await fetch("/health")).json();
  modelId = health.model;
  $("model").textContent = `${health.model}: ${health.n_layer} layers, ${health.n_head} heads, context ` +
    `${health.context_size} tokens; ${health.active} sequences being written`;
  for (const [id, n] of [["layer", health.n_layer], ["head", health.n_head]]) {
    $(id).innerHTML = "";
    for (let i = 0; i < n; i++) $(id).add(new Option(String(i), String(i)));
  }
}

function addToken(text, logprob) {
  const span = document.createElement("span");
  span.textContent = text;
  const p = Math.exp(logprob);
  span.style.backgroundColor = `rgba(255, 140, 0, ${(1 - p) * 0.8})`;  // the less likely, the more orange
  span.title = `p = ${p.toFixed(3)}`;
  $("output").appendChild(span);
}

async function generate() {
  const prompt = $("prompt").value;
  const body = { model: modelId, prompt, stream: true, logprobs: 0, max_tokens: numberOrNull("max_tokens"),
                 temperature: numberOrNull("temperature"), top_p: numberOrNull("top_p"), top_k: numberOrNull("top_k") };
  $("output").innerHTML = "";
  const shown = document.createElement("span");
  shown.className = "prompt";
  shown.textContent = prompt;
  $("output").appendChild(shown);
  $("generate").disabled = true;
  setStatus("writing...");
  let text = "", tokens = 0;
  try {
    const response = await fetch("/v1/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!response.ok) throw new Error((await response.json()).error.message);
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {  // one server-sent event per blank line
        const line = buffer.slice(0, end).trim();
        buffer = buffer.slice(end + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices[0], lp = choice.logprobs;
        if (lp) tokens += lp.tokens.length;  // one event may carry several tokens when the page reads slowly
        if (!choice.text) continue;
        if (lp && lp.tokens.join("") === choice.text) lp.tokens.forEach((t, k) => addToken(t, lp.token_logprobs[k]));
        else addToken(choice.text, lp ? Math.min(...lp.token_logprobs) : 0);  // text and tokens apart: shade the whole
        text += choice.text;
      }
    }
    lastText = prompt + text;
    setStatus(`${tokens} tokens; drawing the attention...`);
    await drawAttention();
    setStatus(`${tokens} tokens; attention of layer ${$("layer").value}, head ${$("head").value} drawn`);
  } catch (err) {
    setStatus(String(err.message || err), true);
  } finally {
    $("generate").disabled = false;
  }
}

async function drawAttention() {
  if (!lastText) return;
  const body = { text: lastText, layer: Number($("layer").value), head: Number($("head").value) };
  const response = await fetch("/v1/attention", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const result = await response.json();
  if (!response.ok) throw new Error(result.error.message);
  const canvas = $("heatmap"), ctx = canvas.getContext("2d"), T = result.weights.length;
  const cell = Math.max(1, Math.floor(480 / T));
  canvas.width = canvas.height = cell * T;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  result.weights.forEach((row, i) => row.forEach((w, j) => {
    if (j > i) return;  // causal: nothing above the diagonal
    const shade = Math.round(255 * (1 - Math.sqrt(w)));  // square root: small weights stay visible
    ctx.fillStyle = `rgb(${shade}, ${shade}, 255)`;
    ctx.fillRect(j * cell, i * cell, cell, cell);
  }));
  canvas.title = `layer ${result.layer}, head ${result.head}: ${T} tokens (the last ones of the text)`;
}

$("generate").addEventListener("click", generate);
for (const id of ["layer", "head"]) $(id).addEventListener("change", () => drawAttention().catch((e) => setStatus(String(e.message), true)));
connect().catch((err) => setStatus("cannot reach the server: " + err, true));
