from hpcserve.cli.main import app

app(prog_name="hpcserve")
