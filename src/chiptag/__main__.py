from chiptag.cli import app

app(prog_name="chiptag")
