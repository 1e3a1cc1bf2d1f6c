// Sends every kind of Segment call to cible through the official Node library.
// Usage: node node_client.js HOST WRITE_KEY PREFIX ; prints the JSON list of messageIds sent.
const { Analytics } = require('@segment/analytics-node')

const [host, writeKey, prefix] = process.argv.slice(2)
const analytics = new Analytics({ writeKey, host, flushAt: 5, maxRetries: 3 })
const errors = []
analytics.on('error', (error) => errors.push(String(error.reason || error.code || error)))
const sent = []
const mid = (name) => {
  const id = `${prefix}-${name}`
  sent.push(id)
  return id
}

const anonymousId = `${prefix}-anon`
const userId = `${prefix}-user`
analytics.page({ anonymousId, name: 'Pricing', properties: { url: 'https://shop.example.com/pricing' }, messageId: mid('page') })
analytics.track({ anonymousId, event: 'Product Viewed', properties: { product_id: 'P1' }, messageId: mid('track-anon') })
analytics.identify({ userId, anonymousId, traits: { email: `${prefix}@example.com`, plan: 'pro' }, messageId: mid('identify') })
for (let i = 0; i < 12; i++) {
  analytics.track({ userId, event: 'Email Opened', properties: { i }, messageId: mid(`track-${i}`) })
}
analytics.screen({ userId, name: 'Home', messageId: mid('screen') })
analytics.group({ userId, groupId: `${prefix}-company`, traits: { name: 'ACME' }, messageId: mid('group') })
analytics.alias({ previousId: `${prefix}-old-device`, userId, messageId: mid('alias') })
analytics.closeAndFlush({ timeout: 20000 }).then(() => {
  if (errors.length) {
    console.error('errors: ' + errors.join('; '))
    process.exit(1)
  }
  console.log(JSON.stringify(sent))
})
