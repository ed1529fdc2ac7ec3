"""litellm as a client of `persona-mw serve` (the user travels in extra_body or an X-Persona-User header,
since litellm drops `user` on openai/ routes with a custom api_base).

Run: persona-mw serve --port 8700 &   then   python examples/litellm_client.py --base-url http://127.0.0.1:8700
"""

from __future__ import annotations

import argparse

from persona_mw.adapters.litellm import import_litellm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8700")
    ap.add_argument("--api-key", default="unused", help="a key from server.api_keys, when the server has any")
    args = ap.parse_args()
    litellm = import_litellm()  # offline: no price-list fetch
    common = dict(model="openai/persona", api_base=f"{args.base_url}/v1", api_key=args.api_key, max_tokens=24,
                  extra_headers={"X-Persona-User": "ana"})
    question = [{"role": "user", "content": "Name a colour."}]
    r = litellm.completion(messages=question, **common)
    print("answer:", r.choices[0].message.content)
    stream = litellm.completion(messages=question, stream=True, **common)
    print("streamed:", "".join(c.choices[0].delta.content or "" for c in stream))


if __name__ == "__main__":
    main()
