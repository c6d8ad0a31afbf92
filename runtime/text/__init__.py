"""Text in and out: tokenizer (with pretokenize and its unicode_ranges), chat_template
(sandboxed Jinja), constrain (grammar- and schema-constrained decoding)."""
