/* A list of users and its count badge: the online users (the lobby's panel)
 * or a room's members with who is online. Clicking another user opens the
 * private conversation with them. */
(function (ChatApp, Backbone) {
  'use strict';

  ChatApp.views.UserListView = Backbone.View.extend({
    template: ChatApp.template('user-template'),

    events: {
      'click [data-action="private"]': 'openPrivate'
    },

    initialize: function (options) {
      this.badge = options.badge;
      this.me = options.me;             // function: the logged-in name
      this.vent = options.vent;
      this.presence = !!options.presence; // members: show who is online, count "online/all"
      this.listenTo(this.collection, 'update reset', this.render);
      if (this.presence) {
        this.listenTo(this.collection, 'change:online', this.render);
      }
    },

    render: function () {
      var me = this.me();
      var items = this.collection.map(function (user) {
        var li = document.createElement('li');
        var online = this.presence ? !!user.get('online') : true;
        li.className = 'list-group-item user' + (online ? '' : ' user-offline');
        li.dataset.name = user.get('name'); // a DOM property: never parsed as HTML
        li.innerHTML = this.template({ name: user.get('name'), isMe: user.get('name') === me, presence: this.presence, online: online });
        return li;
      }, this);
      this.$el.empty().append(items);
      this.badge.textContent = this.presence
        ? this.collection.onlineCount() + '/' + this.collection.length
        : String(this.collection.length);
      return this;
    },

    openPrivate: function (event) {
      var li = event.currentTarget.closest('li');
      if (li && this.vent) {
        this.vent.trigger('openPrivate', li.dataset.name);
      }
    }
  });
})(ChatApp, Backbone);
