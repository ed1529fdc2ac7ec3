"""The openai SDK against `persona-mw serve`: state a preference over HTTP, then chat (plain and streamed).

Run: persona-mw serve --port 8700 &   then   python examples/openai_sdk_client.py --base-url http://127.0.0.1:8700
"""

from __future__ import annotations

import argparse

import httpx
import openai


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8700")
    ap.add_argument("--api-key", default="unused", help="a key from server.api_keys, when the server has any")
    args = ap.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"}

    httpx.post(f"{args.base_url}/v1/feedback", headers=headers, timeout=30,
               json={"kind": "stated", "user": "ana", "text": "Answer in one short sentence."}).raise_for_status()
    client = openai.OpenAI(base_url=f"{args.base_url}/v1", api_key=args.api_key, timeout=300)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    raw = client.chat.completions.with_raw_response.create(model="persona", messages=question, user="ana",
                                                           max_tokens=24)
    answer = raw.parse()
    trace_id = raw.headers["x-persona-trace-id"]
    print("answer:", answer.choices[0].message.content)
    explained = httpx.get(f"{args.base_url}/v1/traces/{trace_id}", headers=headers, timeout=30).json()
    print("granularity:", explained["granularity"], "| changed by:", [s["plugin"] for s in explained["changed_by"]])
    print("streamed: ", end="")
    for chunk in client.chat.completions.create(model="persona", messages=question, user="ana", max_tokens=24,
                                                stream=True):
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()


if __name__ == "__main__":
    main()
