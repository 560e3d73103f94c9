from ktr.cli import main

main()
