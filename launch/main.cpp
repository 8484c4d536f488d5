#include "launch/commands.h"

int main(int argc, char** argv) { return brigade::launch::run_cli(argc, argv); }
