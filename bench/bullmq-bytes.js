#!/usr/bin/env node
// Redis bytes per queued BullMQ job, measured the way wq-bench's `scale` phase measures wq's:
// used_memory growth over N waiting jobs of one 64-byte payload each, added with addBulk (1000
// per call) exactly as ../shared/peers/bench_bullmq.js adds them (removeOnComplete, otherwise
// BullMQ's defaults). Uses the peers' pinned node_modules; run it with
//   NODE_PATH=../shared/peers/node_modules node bench/bullmq-bytes.js [N] [redis port]
// against a private, empty redis-server (it flushes it).
'use strict';

const { Queue } = require('bullmq');
const IORedis = require('ioredis');

async function usedMemory(redis) {
  const info = await redis.info('memory');
  return Number(/used_memory:(\d+)/.exec(info)[1]);
}

async function main() {
  const n = parseInt(process.argv[2] || '100000', 10);
  const port = parseInt(process.argv[3] || '6390', 10);
  const connection = new IORedis({ host: '127.0.0.1', port, maxRetriesPerRequest: null });
  await connection.flushall();
  const queue = new Queue('bytes', { connection, defaultJobOptions: { removeOnComplete: true } });
  await queue.waitUntilReady();
  // The queue's own keys (meta, events) exist before the jobs are counted.
  await queue.add('noop', { p: 'warm-up' });
  await queue.drain();
  const before = await usedMemory(connection);
  for (let i = 0; i < n; i += 1000) {
    const jobs = [];
    for (let j = i; j < Math.min(n, i + 1000); j++) {
      const head = 'item-' + String(j).padStart(10, '0') + ':';
      jobs.push({ name: 'noop', data: { p: head + 'x'.repeat(64 - head.length) } });
    }
    await queue.addBulk(jobs);
  }
  const after = await usedMemory(connection);
  const waiting = (await queue.getJobCounts('waiting')).waiting;
  console.log(`bullmq: ${waiting} waiting jobs, ${((after - before) / n).toFixed(0)} Redis bytes per job`);
  await queue.close();
  connection.disconnect();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
