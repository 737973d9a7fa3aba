"""Developer tools: loopback stand-ins for GitHub and OpenAI-compatible APIs, payload builders, the demo.

They exist because GitHub and hosted LLM APIs are beyond a test machine's network. Each stand-in speaks
the real wire format and is driven by the real client libraries (PyGithub, `openai`), so what passes
against them exercises the same requests a production run sends.
"""
