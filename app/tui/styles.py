"""The chat app's stylesheet. Kept in Python so it ships with the package without package data."""

CSS = """
#body { height: 1fr; }

#sidebar {
    width: 26;
    border-right: vkey $foreground 20%;
}
#sidebar > .title { padding: 0 1; text-style: bold; color: $text-muted; }
#search { margin: 0 1; }
#conversations { height: 1fr; border: none; padding: 0; background: transparent; }

#main { width: 1fr; }
PullBar { height: 2; padding: 0 1; background: $boost; }
PullBar > Horizontal { height: 1; }
#pull-stage { width: 1fr; height: 1; text-overflow: ellipsis; }
#pull-progress { width: 1fr; }
#pull-hint { color: $text-muted; padding-left: 1; }

.pane { height: 1fr; }
.messages { height: 1fr; padding: 0 1; }
.prompt {
    height: auto;
    min-height: 1;
    max-height: 8;
    border-top: hkey $foreground 20%;
    padding: 0 1;
}
.prompt:focus { border-top: hkey $accent; }

.message { height: auto; margin-bottom: 1; }
.message > .who { text-style: bold; color: $text-muted; }
.message.-user > .who { color: $accent; }
.message.-assistant > .who { color: $success; }
.message.-interrupted > .who { color: $warning; }
.message Markdown { margin: 0; padding: 0; }
.message MarkdownBlock { margin: 0 0 1 0; }
.message .error, .note.-error { color: $error; }
.note { margin-bottom: 1; }

#status {
    height: 1;
    padding: 0 1;
    background: $panel;
    color: $text-muted;
}

.dialog {
    width: 72;
    max-width: 100%;
    height: auto;
    max-height: 100%;
    border: round $accent;
    background: $surface;
    padding: 0 1;
}
.dialog > .title { text-style: bold; margin-bottom: 1; }
.dialog .hint { color: $text-muted; }
.dialog .error { color: $error; }
ModalScreen { align: center middle; }
#help-keys { height: auto; }
#settings #system { height: 4; border: round $foreground 30%; }
#settings .field { height: 1; }
#settings #system { margin-bottom: 1; }
#settings .field-label { width: 14; }
#settings .field Input { width: 1fr; }
#settings .buttons { height: 1; margin-top: 1; }
#settings Button { margin-right: 2; }
#models { height: auto; max-height: 12; border: none; padding: 0; }
"""
