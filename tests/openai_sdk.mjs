// The official `openai` JavaScript package against a real EdgeCoder node (run by tests/ide.rs).
//
// Environment: EC_BASE_URL (http://host:port/v1), EC_API_KEY, EC_MODEL, and OPENAI_JS_DIR, the
// directory whose node_modules holds the package (.ci/setup installs it into target/js-sdk).
// Exits non-zero, with the failed check printed, on any mismatch.

import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.OPENAI_JS_DIR, "package.json"));
const OpenAI = require("openai");

const baseURL = process.env.EC_BASE_URL;
const apiKey = process.env.EC_API_KEY;
const model = process.env.EC_MODEL;
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 60_000 });

function check(cond, what) {
  if (!cond) {
    console.error(`FAILED: ${what}`);
    process.exit(1);
  }
  console.log(`ok: ${what}`);
}

async function status(promise) {
  try {
    await promise;
    return 0;
  } catch (e) {
    return e.status ?? -1;
  }
}

// List models.
const ids = [];
for await (const m of client.models.list()) ids.push(m.id);
check(ids.includes(model), `models.list has ${model}: ${ids}`);

// Chat, not streamed, then streamed: the chunks reassemble to the same text for a fixed seed.
const ask = {
  model,
  messages: [{ role: "user", content: "write a javascript function" }],
  max_tokens: 16,
  temperature: 0,
  seed: 5,
};
const whole = await client.chat.completions.create(ask);
const text = whole.choices[0].message.content;
check(whole.object === "chat.completion", "chat object type");
check(typeof text === "string" && text.length > 0, `chat text: ${JSON.stringify(text)}`);
check(
  whole.usage.total_tokens === whole.usage.prompt_tokens + whole.usage.completion_tokens,
  "usage adds up",
);

const stream = await client.chat.completions.create({
  ...ask,
  stream: true,
  stream_options: { include_usage: true },
});
let joined = "";
let usage = null;
let finish = null;
for await (const chunk of stream) {
  if (chunk.choices.length > 0) {
    joined += chunk.choices[0].delta?.content ?? "";
    finish = chunk.choices[0].finish_reason ?? finish;
  }
  if (chunk.usage) usage = chunk.usage;
}
check(joined === text, `streamed text equals the whole text: ${JSON.stringify(joined)}`);
check(finish === whole.choices[0].finish_reason, `stream finish_reason ${finish}`);
check(usage?.completion_tokens === whole.usage.completion_tokens, "stream usage chunk");

// The stream helper that accumulates chunks into a completion.
const runner = client.chat.completions.stream(ask);
const final = await runner.finalChatCompletion();
check(final.choices[0].message.content === text, "chat.completions.stream() final message");

// Completions: fill-in-the-middle with suffix, and a raw prompt with the FIM tokens as text.
const fim = await client.completions.create({
  model,
  prompt: "function add(a, b) {",
  suffix: "}\n",
  max_tokens: 8,
  temperature: 0,
});
check(fim.object === "text_completion" && typeof fim.choices[0].text === "string", "completion with suffix");
const raw = await client.completions.create({
  model,
  prompt: "<|fim_prefix|>function add(a, b) {<|fim_suffix|>}\n<|fim_middle|>",
  max_tokens: 8,
  temperature: 0,
});
const spelled = await client.completions.create({
  model,
  prompt: "<|fim_prefix|>",
  max_tokens: 1,
  temperature: 0,
});
check(
  spelled.usage.prompt_tokens === 1 && raw.usage.prompt_tokens === fim.usage.prompt_tokens,
  `FIM tokens in a raw prompt are parsed: ${raw.usage.prompt_tokens} tokens raw, ` +
    `${fim.usage.prompt_tokens} with suffix, ${spelled.usage.prompt_tokens} for one control token`,
);

// Errors surface as the SDK's typed errors.
const bad = new OpenAI({ baseURL, apiKey: "ec-wrong", maxRetries: 0 });
check((await status(bad.models.list())) === 401, "a wrong key is 401");
try {
  await client.chat.completions.create({ ...ask, model: "no-such-model" });
  check(false, "an unknown model fails");
} catch (e) {
  check(e instanceof OpenAI.NotFoundError && e.code === "model_not_found", `unknown model: ${e}`);
}
check((await status(client.chat.completions.create({ ...ask, n: 2 }))) === 400, "n = 2 is 400");

console.log("all openai JS SDK checks passed");
