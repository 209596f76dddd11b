# A literal value of a type's description (a pattern, an enum's value) as a Markdown code
# span, so that the docs table shows `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?` and not a link.
# A value holding a backtick gets a double-backtick span (CommonMark strips the spaces).
text: if builtins.match ".*`.*" text == null then "`${text}`" else "`` ${text} ``"
