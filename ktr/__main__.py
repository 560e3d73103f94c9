from ktr.cli import console

console()
