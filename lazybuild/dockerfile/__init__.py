"""The Dockerfile front end: parser, shell-word lexer, instructions, stages (BuildKit semantics)."""
