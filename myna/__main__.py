from myna.cli import main

main()
