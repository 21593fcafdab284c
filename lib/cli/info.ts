/** `tcal info`: version, backend, devices, memory and the kernels compiled into the binary. */
import { Command } from 'commander';
import { version } from '../version';
import { initBackend, cudaDevices, type BackendChoice } from '../backend';
import { native, nativePath } from '../native';

export interface InfoReport {
  version: string;
  addon: { path?: string; buildSystem: string; sourceHash: string };
  backend: ReturnType<typeof initBackend>;
  devices: ReturnType<typeof cudaDevices>;
  kernels: string[];
  cublas: { available: boolean; detail: string };
}

export function collectInfo(backend?: BackendChoice): InfoReport {
  const n = native();
  const b = initBackend({ backend });
  return {
    version,
    addon: { path: nativePath(), buildSystem: n.buildSystem, sourceHash: n.sourceHash },
    backend: b,
    devices: b.cudaDevices > 0 ? cudaDevices() : [],
    kernels: n.compiledKernels(),
    cublas: b.cudaDevices > 0 ? n.blasStatus() : { available: false, detail: 'not loaded (no CUDA device)' },
  };
}

const gib = (b: number): string => `${(b / 2 ** 30).toFixed(1)} GiB`;

export function formatInfo(r: InfoReport): string {
  const lines = [
    `taylor-calibrate ${r.version}`,
    `addon:    ${r.addon.path ?? '?'} (${r.addon.buildSystem}, sources ${r.addon.sourceHash})`,
    `backend:  ${r.backend.backend} (requested ${r.backend.requested}; ${r.backend.reason})`,
    `kernels:  ${r.kernels.join(', ')}`,
    `cuBLAS:   ${r.cublas.available ? r.cublas.detail : `unavailable: ${r.cublas.detail}`}`,
  ];
  for (const d of r.devices) {
    lines.push(
      `device:   cuda:${d.index} ${d.name}, compute capability ${d.computeCapability}, ${d.multiprocessors} SMs, ` +
        `${gib(d.totalMemory)} memory (${gib(d.freeMemory)} free), L2 ${(d.l2Bytes / 2 ** 20).toFixed(0)} MiB`,
    );
  }
  if (r.devices.length === 0) lines.push('device:   cpu');
  return lines.join('\n');
}

export function infoCommand(): Command {
  return new Command('info')
    .description('print version, backend, devices and compiled kernels')
    .option('--backend <choice>', 'auto | cuda | cpu', process.env.TCAL_BACKEND ?? 'auto')
    .option('--json', 'print JSON')
    .action((opts: { backend: BackendChoice; json?: boolean }) => {
      const r = collectInfo(opts.backend);
      process.stdout.write((opts.json ? JSON.stringify(r, null, 2) : formatInfo(r)) + '\n');
    });
}
