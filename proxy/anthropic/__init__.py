"""The Anthropic Messages API: request models, the conversation as the chat template sees it,
where its cache breakpoints fall, responses with cache usage, and the SSE events."""
