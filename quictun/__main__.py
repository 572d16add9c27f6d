from quictun.cli import main

main()
