"""The tool-call gate for agent runtimes' hooks (Claude Code PreToolUse)."""
