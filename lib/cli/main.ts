#!/usr/bin/env node
/** The `tcal` command line. Each subcommand lives in its own file under lib/cli/. */
import { Command } from 'commander';
import { version } from '../version';
import { infoCommand } from './info';
import { evalCommand } from './eval';
import { statsCommand } from './stats';
import { pretrainCommand } from './pretrain';
import { TcalError } from '../errors';

export function buildProgram(): Command {
  const program = new Command();
  program.name('tcal').description('Taylor-Calibrate: softmax Transformers → hybrid Gated DeltaNet').version(version);
  program.addCommand(infoCommand());
  program.addCommand(evalCommand());
  program.addCommand(statsCommand());
  program.addCommand(pretrainCommand());
  return program;
}

async function main(): Promise<void> {
  try {
    await buildProgram().parseAsync(process.argv);
  } catch (e) {
    if (e instanceof TcalError) {
      process.stderr.write(`tcal: ${e.name} (${e.code}): ${e.message}\n`);
      process.exitCode = 1;
      return;
    }
    throw e;
  }
}

if (require.main === module) void main();
